// A fixed (not learned) classifier of toy-world images (ToyWorld.swift, mirroring tools/toyworld/world.py):
// it judges what a model generated for a toy-world prompt, so it tolerates pixel noise, slight blur and a faint
// background tint.

/// What `ToyWorldClassifier` found: the class, how well the shape fitted, and where the object is.
public struct ToyWorldClassification: Equatable, Sendable {
    public let colour: ToyColour
    public let shape: ToyShape
    /// The intersection over union of the object's pixels with the best-fitting ideal `shape` (0…1).
    public let iou: Double
    /// The IoU of the runner-up shape: how clear the decision was.
    public let runnerUpIoU: Double
    /// The object's bounding box in 64×64 pixel units: left, top, width, height.
    public let box: (x: Int, y: Int, width: Int, height: Int)
    /// The object's pixel count (64×64 semantics).
    public let pixelCount: Int

    public var toyClass: ToyClass { ToyClass(colour, shape) }

    public static func == (lhs: Self, rhs: Self) -> Bool {
        lhs.colour == rhs.colour && lhs.shape == rhs.shape && lhs.iou == rhs.iou && lhs.runnerUpIoU == rhs.runnerUpIoU
            && lhs.box == rhs.box && lhs.pixelCount == rhs.pixelCount
    }
}

/// Names the colour and shape of the object in a toy-world image, deterministically:
/// 1. the image is resampled (area average) to 64×64 if it has another size;
/// 2. each pixel's "ink" is 255 − its smallest channel (white 0, every palette colour about 200); the
///    background level is the median ink, the object level the 99th percentile; without a contrast of at least
///    `minimumContrast` there is no object;
/// 3. foreground = ink above the midpoint of the two levels; the object is the largest 4-connected foreground
///    component, if it has at least `minimumPixels` pixels;
/// 4. colour = the palette colour nearest (Euclidean RGB) to the mean of the component's core pixels (those whose
///    four neighbours are in the component too: blur and anti-aliasing stay out);
/// 5. shape = the shape whose ideal mask (the world's own coverage, thresholded at 0.5) best overlaps (IoU) the
///    component, each shape fitted to the component's bounding box as a square of side max(w, h) centred on it,
///    as the box itself (stretched), and as those boxes grown and shrunk by a pixel.
public enum ToyWorldClassifier {
    /// The least difference between object and background ink for an object to be present.
    public static let minimumContrast = 40.0
    /// The fewest pixels (at 64×64) an object has (the world's smallest triangle has about 180).
    public static let minimumPixels = 12

    /// Classifies `image` (any size; RGB bytes).
    public static func classify(_ image: RGBImage) -> ToyWorldClassification? {
        classify(rgb: image.pixels, width: image.width, height: image.height)
    }

    /// Classifies `rgb`, `width · height · 3` bytes row-major; nil when no object is found (or the byte count
    /// does not match).
    public static func classify(rgb: [UInt8], width: Int, height: Int) -> ToyWorldClassification? {
        guard width > 0, height > 0, rgb.count == width * height * 3 else { return nil }
        let size = ToyWorld.size
        let pixels = resample(rgb, width: width, height: height, to: size)
        let count = size * size

        // Ink levels: background (median) and object (99th percentile).
        var ink = [Double](repeating: 0, count: count)
        for p in 0..<count { ink[p] = 255 - min(pixels[3 * p], pixels[3 * p + 1], pixels[3 * p + 2]) }
        let sorted = ink.sorted()
        let background = sorted[count / 2], object = sorted[(count - 1) * 99 / 100]
        guard object - background >= minimumContrast else { return nil }
        let threshold = (background + object) / 2

        // The largest 4-connected component of the foreground.
        var label = [Int](repeating: -1, count: count)
        var best: [Int] = []
        var stack: [Int] = []
        for start in 0..<count where ink[start] > threshold && label[start] < 0 {
            var component: [Int] = []
            label[start] = start
            stack.append(start)
            while let p = stack.popLast() {
                component.append(p)
                let x = p % size, y = p / size
                for (nx, ny) in [(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)] where nx >= 0 && nx < size && ny >= 0 && ny < size {
                    let q = ny * size + nx
                    if label[q] < 0 && ink[q] > threshold {
                        label[q] = start
                        stack.append(q)
                    }
                }
            }
            if component.count > best.count { best = component }
        }
        guard best.count >= minimumPixels else { return nil }
        var inComponent = [Bool](repeating: false, count: count)
        for p in best { inComponent[p] = true }

        // Colour: the mean of the core pixels, snapped to the palette.
        var core = best.filter { p in
            let x = p % size, y = p / size
            return x > 0 && x < size - 1 && y > 0 && y < size - 1
                && inComponent[p - 1] && inComponent[p + 1] && inComponent[p - size] && inComponent[p + size]
        }
        if core.count < 4 { core = best }
        var mean = (0.0, 0.0, 0.0)
        for p in core {
            mean.0 += pixels[3 * p]
            mean.1 += pixels[3 * p + 1]
            mean.2 += pixels[3 * p + 2]
        }
        let n = Double(core.count)
        mean = (mean.0 / n, mean.1 / n, mean.2 / n)
        let colour = ToyColour.allCases.min { a, b in distance(mean, a) < distance(mean, b) }!

        // Shape: the best IoU over fitted boxes.
        var (xMin, xMax, yMin, yMax) = (size, -1, size, -1)
        for p in best {
            xMin = min(xMin, p % size); xMax = max(xMax, p % size)
            yMin = min(yMin, p / size); yMax = max(yMax, p / size)
        }
        let w = Double(xMax - xMin + 1), h = Double(yMax - yMin + 1)
        let centreX = Double(xMin) + w / 2, centreY = Double(yMin) + h / 2
        var boxes: [(width: Double, height: Double)] = []
        for grow in [0.0, -1.0, 1.0] {
            let side = max(w, h) + grow
            boxes.append((side, side))
            if w != h { boxes.append((w + grow, h + grow)) }
        }
        let rows = max(0, yMin - 2)..<min(size, yMax + 3), columns = max(0, xMin - 2)..<min(size, xMax + 3)
        var scores: [(shape: ToyShape, iou: Double)] = []
        for shape in ToyShape.allCases {
            var bestIoU = 0.0
            for box in boxes where box.width >= 1 && box.height >= 1 {
                let coverage = ToyWorld.coverage(shape: shape, x0: centreX - box.width / 2, y0: centreY - box.height / 2,
                                                 width: box.width, height: box.height, size: size,
                                                 supersample: ToyWorld.supersample, rows: rows, columns: columns)
                var intersection = 0, union = best.count
                for y in rows {
                    for x in columns where coverage[y * size + x] >= 0.5 {
                        if inComponent[y * size + x] { intersection += 1 } else { union += 1 }
                    }
                }
                bestIoU = max(bestIoU, Double(intersection) / Double(union))
            }
            scores.append((shape, bestIoU))
        }
        let ranked = scores.enumerated().sorted { a, b in
            a.element.iou != b.element.iou ? a.element.iou > b.element.iou : a.offset < b.offset
        }.map(\.element)
        return ToyWorldClassification(colour: colour, shape: ranked[0].shape, iou: ranked[0].iou, runnerUpIoU: ranked[1].iou,
                                      box: (xMin, yMin, xMax - xMin + 1, yMax - yMin + 1), pixelCount: best.count)
    }

    private static func distance(_ mean: (Double, Double, Double), _ colour: ToyColour) -> Double {
        let rgb = colour.rgb
        let dr = mean.0 - Double(rgb.red), dg = mean.1 - Double(rgb.green), db = mean.2 - Double(rgb.blue)
        return dr * dr + dg * dg + db * db
    }

    /// The image as `size` × `size` RGB Doubles: each output pixel the area-weighted mean of the input pixels
    /// it covers (the input itself, as Doubles, when it already has that size).
    static func resample(_ rgb: [UInt8], width: Int, height: Int, to size: Int) -> [Double] {
        if width == size && height == size { return rgb.map(Double.init) }
        // The input pixels overlapping output interval [i, i+1) · scale, with their overlap lengths.
        func weights(input: Int) -> [[(index: Int, weight: Double)]] {
            let scale = Double(input) / Double(size)
            return (0..<size).map { i in
                let start = Double(i) * scale, end = Double(i + 1) * scale
                var result: [(Int, Double)] = []
                var j = Int(start)
                while j < input && Double(j) < end {
                    let overlap = min(end, Double(j + 1)) - max(start, Double(j))
                    if overlap > 0 { result.append((j, overlap / scale)) }
                    j += 1
                }
                return result
            }
        }
        let xs = weights(input: width), ys = weights(input: height)
        var output = [Double](repeating: 0, count: size * size * 3)
        for y in 0..<size {
            for x in 0..<size {
                var sum = (0.0, 0.0, 0.0)
                for (sy, wy) in ys[y] {
                    for (sx, wx) in xs[x] {
                        let weight = wx * wy, p = (sy * width + sx) * 3
                        sum.0 += weight * Double(rgb[p])
                        sum.1 += weight * Double(rgb[p + 1])
                        sum.2 += weight * Double(rgb[p + 2])
                    }
                }
                let o = (y * size + x) * 3
                output[o] = sum.0
                output[o + 1] = sum.1
                output[o + 2] = sum.2
            }
        }
        return output
    }
}
