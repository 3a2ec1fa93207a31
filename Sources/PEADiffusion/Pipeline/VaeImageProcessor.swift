/// What diffusers' VaeImageProcessor does to a PIL init image and mask before the img2img and inpainting
/// pipelines see them (resize_mode "default", vae_scale_factor 8), with Pillow's arithmetic (`ImageResampling`):
/// - the output size, when the caller gives none, is the init image's rounded down to multiples of 8
///   (`get_default_height_width`);
/// - the init image and the mask are resized to it with `Image.resize(..., LANCZOS)` (reducing_gap None), the
///   mask while still RGB — the mask processor converts to "L" and binarises after resizing, which
///   `StableDiffusionPipeline.binaryMask` does;
/// - `mask_processor.blur(mask, blur_factor)` (Pillow's GaussianBlur), which diffusers leaves to the caller
///   before the pipeline, on the mask at its own size.
public enum VaeImageProcessor {
    public static let vaeScaleFactor = 8
    /// The largest mask blur radius accepted: Pillow takes any, but a radius far beyond any image only costs
    /// float range (and blurs the mask to one value).
    public static let maximumBlur = 1000.0

    /// `get_default_height_width`: a given width or height as is, a missing one the image's rounded down to a
    /// multiple of `multiple` (the pipeline's VAE scale factor, 8 for every SD1/SD2/SDXL VAE). An image that rounds
    /// down to nothing is an error naming `name` (its path or field).
    public static func outputSize(of image: RGBImage, named name: String, width: Int?, height: Int?,
                                  multiple: Int = vaeScaleFactor) throws -> (width: Int, height: Int) {
        let size = (width: width ?? image.width / multiple * multiple, height: height ?? image.height / multiple * multiple)
        guard size.width >= multiple, size.height >= multiple else {
            throw PEAError.invalidFile(path: name, reason: "the image is \(image.width)×\(image.height); it must be at least "
                + "\(multiple)×\(multiple) pixels (its size rounded down to multiples of \(multiple) is the output's)")
        }
        return size
    }

    /// `image.resize((width, height), resample=LANCZOS)`: an image already that size is kept as is.
    public static func resize(_ image: RGBImage, width: Int, height: Int) -> RGBImage {
        ImageResampling.resize(image, width: width, height: height, filter: .lanczos)
    }

    /// `VaeImageProcessor.blur(mask, blur_factor)`: Pillow's `GaussianBlur(radius)` (radius 0: unchanged).
    public static func blur(_ mask: RGBImage, radius: Double) -> RGBImage {
        ImageResampling.gaussianBlur(mask, radius: Float(radius))
    }

    /// A mask blur radius from the command line, a prompt file or a request, checked: finite, in
    /// 0...`maximumBlur`. `name` names the setting in the error.
    public static func checkedBlur(_ value: Double, name: String) throws -> Double {
        guard value.isFinite, value >= 0, value <= maximumBlur else {
            throw PEAError.usage("\(name) must be a number in 0...\(Int(maximumBlur)) (a Gaussian blur's standard deviation in pixels), got \(value)")
        }
        return value
    }
}
