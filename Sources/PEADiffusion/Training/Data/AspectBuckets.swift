// How training images are shaped: one square size (the SD1.x scripts' transform), or aspect-ratio buckets (the
// SDXL script's): each image goes to the bucket nearest its aspect ratio, is resized to cover it and cropped to
// it, and the sizes and crop are kept as SDXL's micro-conditioning (`time_ids`).
//
// The bucket rule is the official custom_dataset_sdxl.py's (OPPO-Mente-Lab/PEA-Diffusion): buckets are
// WIDTH×HEIGHT; the bucket is the first minimum of |w/h − W/H|; the image is resized (Pillow bilinear) to height
// bh and width int(W·bh/H) when that width covers bw, else to width bw and height int(H·bw/W); the crop is
// random (the authors' default) or centred. Two departures, both deliberate:
// - time_ids are (height, width) pairs — (H, W, top, left, bh, bw) — as diffusers' SDXL pipelines pass them at
//   inference; the authors' script passes PIL's (width, height) order for the sizes.
// - A random crop is drawn once per image, not per epoch: from SplitMix64(seed: FNV-1a(the image file's
//   bytes) ^ the run's seed), top first, then left, each uniform over its range. The crop is then a fixed
//   function of the image and the seed, so a cached latent stays valid and a resumed run sees the same crops.

/// The buckets of aspect-ratio bucketing, WIDTH×HEIGHT each.
public struct AspectBuckets: Equatable, Sendable, CustomStringConvertible {
    public struct Size: Equatable, Hashable, Sendable {
        public let width: Int
        public let height: Int

        public init(width: Int, height: Int) {
            self.width = width
            self.height = height
        }
    }

    public let sizes: [Size]
    /// The largest width or height a bucket may have (the training resolution's bound too).
    public static let maxSide = 8192

    /// The nine buckets of the authors' SDXL training (custom_dataset_sdxl.py), portrait to landscape.
    public static let sdxl = try! AspectBuckets([(448, 896), (448, 832), (512, 768), (576, 704), (640, 640), (704, 576),
                                                 (768, 512), (832, 448), (896, 448)].map { Size(width: $0.0, height: $0.1) })

    /// - Throws: `PEAError.usage` for no buckets, a side outside 1...`maxSide` or a bucket given twice.
    public init(_ sizes: [Size]) throws {
        guard !sizes.isEmpty else { throw PEAError.usage("aspect buckets: at least one bucket is needed") }
        for size in sizes where size.width < 1 || size.height < 1 {
            throw PEAError.usage("aspect buckets: \(size.width)x\(size.height) is not a size")
        }
        for size in sizes where size.width > Self.maxSide || size.height > Self.maxSide {
            throw PEAError.usage("aspect buckets: \(size.width)x\(size.height) is larger than \(Self.maxSide) on a side")
        }
        guard Set(sizes).count == sizes.count else { throw PEAError.usage("aspect buckets: a bucket is listed twice in \(sizes)") }
        self.sizes = sizes
    }

    /// `sdxl`, or a comma-separated list of WIDTHxHEIGHT (`448x896,640x640,896x448`).
    public static func parse(_ text: String) throws -> AspectBuckets {
        if text == "sdxl" { return .sdxl }
        return try AspectBuckets(text.split(separator: ",", omittingEmptySubsequences: false).map { part in
            let sides = String(part).trimmingWhitespace().lowercased().split(separator: "x", omittingEmptySubsequences: false)
            guard sides.count == 2, let width = Int(sides[0]), let height = Int(sides[1]) else {
                throw PEAError.usage("aspect buckets: '\(part)' is not WIDTHxHEIGHT (e.g. 640x640); give 'sdxl' or a list like 448x896,640x640,896x448")
            }
            return Size(width: width, height: height)
        })
    }

    /// The index of the bucket whose aspect ratio is nearest `width / height` (the first on a tie).
    public func nearest(width: Int, height: Int) -> Int {
        let aspect = Double(width) / Double(height)
        var best = 0, bestDistance = Double.infinity
        for (index, size) in sizes.enumerated() {
            let distance = abs(Double(size.width) / Double(size.height) - aspect)
            if distance < bestDistance { (best, bestDistance) = (index, distance) }
        }
        return best
    }

    /// The list as `parse` reads it: `448x896,448x832,…`.
    public var description: String { sizes.map { "\($0.width)x\($0.height)" }.joined(separator: ",") }
}

/// Where a random bucket crop lies: drawn per image (see the top of this file), or centred.
public enum CropMode: String, CaseIterable, Sendable {
    case random, center
}

/// The shape training images are brought to.
public enum TrainingImageShape: Equatable, Sendable {
    /// Shorter side resized to the size, centre-cropped to a square (the SD1.x scripts').
    case square(Int)
    /// Aspect-ratio buckets (the SDXL script's).
    case buckets(AspectBuckets, crop: CropMode)

    /// What distinguishes the latents of one shape from another's in a latent cache: the square's side (the key
    /// caches have always used), or the buckets and crop (with the seed, which picks random crops).
    public func cacheKey(seed: UInt64) -> String {
        switch self {
        case .square(let side): return String(side)
        case .buckets(let buckets, .center): return "buckets=\(buckets);crop=center"
        case .buckets(let buckets, .random): return "buckets=\(buckets);crop=random;seed=\(seed)"
        }
    }

    /// The sizes every image of this shape has (one for a square).
    public var sizes: [AspectBuckets.Size] {
        switch self {
        case .square(let side): return [AspectBuckets.Size(width: side, height: side)]
        case .buckets(let buckets, _): return buckets.sizes
        }
    }
}

/// Where a training tensor came from in its image: SDXL's micro-conditioning.
public struct ImageGeometry: Equatable, Sendable {
    /// The decoded image's size.
    public var originalWidth, originalHeight: Int
    /// The crop's top-left corner in the resized image.
    public var cropTop, cropLeft: Int
    /// The tensor's size (the square's side, or the bucket).
    public var width, height: Int

    public init(originalWidth: Int, originalHeight: Int, cropTop: Int, cropLeft: Int, width: Int, height: Int) {
        self.originalWidth = originalWidth
        self.originalHeight = originalHeight
        self.cropTop = cropTop
        self.cropLeft = cropLeft
        self.width = width
        self.height = height
    }

    /// SDXL's `time_ids`: original size, crop top-left, target size, as (height, width) pairs.
    public var timeIds: [Float] { [originalHeight, originalWidth, cropTop, cropLeft, height, width].map(Float.init) }

    /// The six numbers as text (`H,W,top,left,h,w`), for a cache file's metadata.
    public var serialized: String { [originalHeight, originalWidth, cropTop, cropLeft, height, width].map(String.init).joined(separator: ",") }

    /// Parses `serialized`; nil for anything else.
    public init?(serialized text: String) {
        let values = text.split(separator: ",").compactMap { Int($0) }
        guard values.count == 6, values.allSatisfy({ $0 >= 0 }) else { return nil }
        self.init(originalWidth: values[1], originalHeight: values[0], cropTop: values[2], cropLeft: values[3],
                  width: values[5], height: values[4])
    }
}

extension TrainingImageTransform {
    /// The training tensor ([3, h, w] f32 in [-1, 1]) of a decoded image and where it came from. `cropSeed` picks
    /// a random bucket crop (the image's FNV-1a ^ the run's seed); other shapes ignore it.
    public static func shaped(_ image: RGBImage, to shape: TrainingImageShape, cropSeed: UInt64) -> (tensor: HostTensor, geometry: ImageGeometry) {
        switch shape {
        case .square(let side):
            let resized = resizeShorterSide(image, to: side)
            let geometry = ImageGeometry(originalWidth: image.width, originalHeight: image.height,
                                         cropTop: cropOffset(resized.height, side), cropLeft: cropOffset(resized.width, side),
                                         width: side, height: side)
            return (normalizedTensor(centerCrop(resized, size: side)), geometry)
        case .buckets(let buckets, let mode):
            let bucket = buckets.sizes[buckets.nearest(width: image.width, height: image.height)]
            let (width, height) = coveringSize(width: image.width, height: image.height, bucket: bucket)
            let resized = resize(image, width: width, height: height)
            let top: Int, left: Int
            switch mode {
            case .center:
                (top, left) = (cropOffset(height, bucket.height), cropOffset(width, bucket.width))
            case .random:
                var random = SplitMix64(seed: cropSeed)
                top = TrainingDataset.uniform(below: height - bucket.height + 1, &random)
                left = TrainingDataset.uniform(below: width - bucket.width + 1, &random)
            }
            let geometry = ImageGeometry(originalWidth: image.width, originalHeight: image.height, cropTop: top, cropLeft: left,
                                         width: bucket.width, height: bucket.height)
            return (normalizedTensor(crop(resized, top: top, left: left, width: bucket.width, height: bucket.height)), geometry)
        }
    }

    /// The size the authors resize an image to before cropping it to `bucket`: the bucket's height with the
    /// width scaled to match when that covers the bucket's width, else the bucket's width with the height scaled
    /// (Python's `int(W * bh / H)`: one correctly rounded division, then truncation).
    public static func coveringSize(width: Int, height: Int, bucket: AspectBuckets.Size) -> (width: Int, height: Int) {
        let scaledWidth = Int(Double(width * bucket.height) / Double(height))
        if scaledWidth >= bucket.width { return (scaledWidth, bucket.height) }
        return (bucket.width, Int(Double(height * bucket.width) / Double(width)))
    }

    /// The `width`×`height` box of `image` at (`top`, `left`).
    static func crop(_ image: RGBImage, top: Int, left: Int, width: Int, height: Int) -> RGBImage {
        precondition(top >= 0 && left >= 0 && top + height <= image.height && left + width <= image.width,
                     "crop \(width)×\(height) at (\(top), \(left)) from a \(image.width)×\(image.height) image")
        if width == image.width && height == image.height { return image }
        var pixels = [UInt8](repeating: 0, count: width * height * 3)
        image.pixels.withUnsafeBufferPointer { source in
            pixels.withUnsafeMutableBufferPointer { out in
                for row in 0..<height {
                    let from = ((top + row) * image.width + left) * 3
                    for index in 0..<(width * 3) { out[row * width * 3 + index] = source[from + index] }
                }
            }
        }
        return RGBImage(width: width, height: height, pixels: pixels)
    }
}
