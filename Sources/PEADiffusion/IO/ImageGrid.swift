/// Sheets of images: samples side by side (validation grids, `pea toyworld grid`).
extension RGBImage {
    /// Tiles same-size images row-major into one image, `columns` per row (fewer when there are fewer images),
    /// with a `gutter`-pixel white gap between neighbours; cells of an unfilled last row stay white.
    /// - Throws: `PEAError.shapeMismatch` naming the first image whose size differs from the first's (`names`
    ///   name the images in messages), `PEAError.usage` for no images or `columns` < 1.
    public static func tiled(_ images: [RGBImage], columns: Int, gutter: Int = 2, names: [String]? = nil) throws -> RGBImage {
        guard let first = images.first else { throw PEAError.usage("grid: no images to tile") }
        guard columns >= 1 else { throw PEAError.usage("grid: the columns must be at least 1, got \(columns)") }
        guard gutter >= 0 else { throw PEAError.usage("grid: the gutter must not be negative, got \(gutter)") }
        for (index, image) in images.enumerated() where image.width != first.width || image.height != first.height {
            let name = names.map { $0[index] } ?? "image \(index)"
            let firstName = names.map { $0[0] } ?? "image 0"
            throw PEAError.shapeMismatch("\(name) is \(image.width)×\(image.height), but \(firstName) is \(first.width)×\(first.height): grid images must all have the same size")
        }
        let columnCount = min(columns, images.count)
        let rowCount = (images.count + columnCount - 1) / columnCount
        let width = columnCount * first.width + (columnCount - 1) * gutter
        let height = rowCount * first.height + (rowCount - 1) * gutter
        var pixels = [UInt8](repeating: 255, count: width * height * 3)
        for (index, image) in images.enumerated() {
            let left = (index % columnCount) * (first.width + gutter), top = (index / columnCount) * (first.height + gutter)
            let rowBytes = first.width * 3
            for y in 0..<first.height {
                let target = ((top + y) * width + left) * 3
                pixels.replaceSubrange(target..<(target + rowBytes), with: image.pixels[(y * rowBytes)..<((y + 1) * rowBytes)])
            }
        }
        return RGBImage(width: width, height: height, pixels: pixels)
    }
}
